//! Which instruction set the kernels use, detected at run time.
//!
//! The build never assumes a target CPU (AMX instructions crash some virtual
//! machines, so `target-cpu=native` is not an option); every SIMD function is
//! compiled with explicit `#[target_feature]`s and chosen here.

/// A kernel family. Ordered from slowest to fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust; the reference every other path is tested against.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL with VNNI integer dot products.
    Avx512Vnni,
}

impl Isa {
    /// The fastest family this CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("f16c")
                && std::is_x86_feature_detected!("fma")
            {
                return Isa::Avx512Vnni;
            }
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every family this CPU can run, slowest first (for tests that compare them).
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni].into_iter().filter(|&i| i <= best).collect()
    }

    /// Parses `scalar`, `avx2` or `avx512` (for settings and benchmarks).
    pub fn parse(s: &str) -> Option<Isa> {
        match s {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx512vnni" => Some(Isa::Avx512Vnni),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// This family, or the best available if the CPU cannot run it.
    pub fn or_best(self) -> Isa {
        self.min(Isa::detect())
    }
}
