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
    /// Every family, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];

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
        Isa::ALL.into_iter().filter(|&i| i <= best).collect()
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

/// For tests: which SIMD paths this CPU lets them cover. A missing CPU feature is a
/// property of the machine, not a missing install, so tests say so on stderr and never
/// fail for it.
#[cfg(test)]
pub(crate) mod testing {
    use super::Isa;

    /// Writes `msg` straight to the process's stderr, past the test harness's capture,
    /// so it shows in a plain `cargo test`.
    pub(crate) fn say(msg: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{msg}");
    }

    /// [`Isa::available`], after a line on stderr naming the families `test` leaves
    /// untested because this CPU cannot run them.
    pub(crate) fn isas_for(test: &str) -> Vec<Isa> {
        let available = Isa::available();
        let untested: Vec<&str> = Isa::ALL.iter().filter(|i| !available.contains(i)).map(|i| i.name()).collect();
        if !untested.is_empty() {
            say(&format!("{test}: not testing {}: this CPU cannot run it", untested.join(", ")));
        }
        available
    }

    /// Whether this CPU has AVX-512F; if not, says that `test` is skipped.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn has_avx512f(test: &str) -> bool {
        let has = std::is_x86_feature_detected!("avx512f");
        if !has {
            say(&format!("skipped: {test}: this CPU has no AVX-512F (the scalar path is tested elsewhere)"));
        }
        has
    }
}
