//! Compiles every CUDA source in `kernels/cuda/` to PTX with NVRTC and assembles the
//! PTX for sm_80 with `ptxas`, on a machine with no GPU and no CUDA toolkit.
//!
//! The tools come from NVIDIA's pip wheels in `<repo>/.venv-cuda`, which
//! `scripts/setup-cuda-tools.sh` creates. NVRTC is called through the venv's Python
//! (`ctypes`), so this test needs no CUDA crate, no feature and no `LD_LIBRARY_PATH`;
//! `ptxas -v` then reports registers and spills per kernel, printed on stderr (shown
//! even without `--nocapture`).
//!
//! Without the venv, a wheel or a loadable NVRTC, the test fails when
//! `TANDEM_REQUIRE_TOOLS=1` (`scripts/test.sh` sets it once its set-up scripts have
//! run, so CI never passes without compiling the kernels), and otherwise prints
//! `skipped: <why>` on stderr and passes. It never needs a GPU: nothing runs on a device.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Target of the assembly check (A100); the PTX is compiled for the matching virtual arch.
const SM: &str = "sm_80";
const COMPUTE: &str = "compute_80";

/// Python run by the venv's interpreter: `argv = [nvrtc_lib, src, out_ptx, opt...]`.
/// Exit 0: PTX written; exit 1: compile error (log on stderr); exit 2: NVRTC unusable.
const NVRTC_PY: &str = r#"
import ctypes, sys
lib_path, src_path, out_path, opts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
try:
    nvrtc = ctypes.CDLL(lib_path)
except OSError as e:
    print(f"cannot load NVRTC: {e}", file=sys.stderr)
    sys.exit(2)
nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
def check(r, what):
    if r != 0:
        print(f"{what}: {nvrtc.nvrtcGetErrorString(r).decode()}", file=sys.stderr)
        sys.exit(1)
major, minor = ctypes.c_int(), ctypes.c_int()
check(nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
src = open(src_path, "rb").read()
prog = ctypes.c_void_p()
check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, src_path.encode(), 0, None, None),
      "nvrtcCreateProgram")
copts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
r = nvrtc.nvrtcCompileProgram(prog, len(opts), copts)
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(prog, log)
if log.value.strip():
    print(log.value.decode(errors="replace"), file=sys.stderr)
check(r, "nvrtcCompileProgram")
check(nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
ptx = ctypes.create_string_buffer(size.value)
check(nvrtc.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
open(out_path, "wb").write(ptx.value)
print(f"NVRTC {major.value}.{minor.value}")
"#;

/// The kernels `tandem-kvtransfer`'s NCCL transport loads by name.
const KV_BLOCKS_ENTRIES: [&str; 4] =
    ["gather_kv_blocks", "scatter_kv_blocks", "gather_kv_blocks_vec16", "scatter_kv_blocks_vec16"];

struct Tools {
    python: PathBuf,
    nvrtc: PathBuf,
    include: PathBuf,
    ptxas: PathBuf,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("kernels/ has a parent").to_path_buf()
}

/// The venv's tools, or why they are not usable.
fn find_tools(root: &Path) -> Result<Tools, String> {
    let venv = root.join(".venv-cuda");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        return Err(format!("no venv at {} (run scripts/setup-cuda-tools.sh)", venv.display()));
    }
    let out = Command::new(&python)
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed: {}", python.display(), String::from_utf8_lossy(&out.stderr)));
    }
    let nvidia = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("nvidia");
    let lib_dir = nvidia.join("cuda_nvrtc").join("lib");
    let nvrtc = std::fs::read_dir(&lib_dir)
        .ok()
        .and_then(|d| {
            let mut libs: Vec<PathBuf> = d
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    n.starts_with("libnvrtc.so")
                })
                .collect();
            libs.sort();
            libs.into_iter().next()
        })
        .ok_or_else(|| format!("no libnvrtc.so* in {} (wheel nvidia-cuda-nvrtc-cu12 missing?)", lib_dir.display()))?;
    let include = nvidia.join("cuda_runtime").join("include");
    if !include.join("cuda_fp16.h").exists() {
        return Err(format!("no cuda_fp16.h in {} (wheel nvidia-cuda-runtime-cu12 missing?)", include.display()));
    }
    let ptxas = nvidia.join("cuda_nvcc").join("bin").join("ptxas");
    if !ptxas.exists() {
        return Err(format!("no ptxas at {} (wheel nvidia-cuda-nvcc-cu12 missing?)", ptxas.display()));
    }
    Ok(Tools { python, nvrtc, include, ptxas })
}

/// Per-kernel figures from `ptxas -v`.
#[derive(Debug, Default)]
struct KernelStats {
    name: String,
    registers: Option<u32>,
    spill_stores: Option<u32>,
    spill_loads: Option<u32>,
    stack: Option<u32>,
}

/// The number just before `unit` in `line`, e.g. `number_before(l, "registers")`.
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas -v` output: a "Compiling entry function 'name'" line, then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N registers".
fn parse_ptxas(log: &str) -> Vec<KernelStats> {
    let mut out: Vec<KernelStats> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or(rest).to_string();
            out.push(KernelStats { name, ..Default::default() });
        } else if let Some(k) = out.last_mut() {
            if line.contains("spill stores") {
                k.stack = number_before(line, "bytes stack frame");
                k.spill_stores = number_before(line, "bytes spill stores");
                k.spill_loads = number_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers");
            }
        }
    }
    out
}

fn cuda_sources(root: &Path) -> Vec<PathBuf> {
    let dir = root.join("kernels").join("cuda");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_cuda_source_compiles_to_ptx_and_assembles_for_sm80() {
    let root = repo_root();
    let sources = cuda_sources(&root);
    assert!(!sources.is_empty(), "no .cu files in kernels/cuda");
    let tools = match find_tools(&root) {
        Ok(t) => t,
        Err(why) => return tools_missing(&why),
    };
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cuda_ptx");
    std::fs::create_dir_all(&out_dir).expect("create the PTX output dir");

    for src in &sources {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let cubin = out_dir.join(format!("{stem}.{SM}.cubin"));
        let _ = std::fs::remove_file(&ptx);

        let nvrtc = Command::new(&tools.python)
            .arg("-c")
            .arg(NVRTC_PY)
            .arg(&tools.nvrtc)
            .arg(src)
            .arg(&ptx)
            .arg(format!("--gpu-architecture={COMPUTE}"))
            .arg("--std=c++17")
            .arg(format!("--include-path={}", tools.include.display()))
            .output()
            .expect("run the venv's python");
        let stderr = String::from_utf8_lossy(&nvrtc.stderr);
        if nvrtc.status.code() == Some(2) {
            return tools_missing(stderr.trim());
        }
        assert!(nvrtc.status.success(), "NVRTC failed on {}:\n{stderr}", src.display());
        if !stderr.trim().is_empty() {
            say(&format!("{stem}.cu: NVRTC log:\n{stderr}"));
        }
        let ptx_text = std::fs::read_to_string(&ptx).expect("read the PTX");
        let entries: Vec<&str> = ptx_text
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap_or(l).trim())
            .collect();
        assert!(!entries.is_empty(), "{stem}.cu: the PTX has no kernel entry");
        if stem == "kv_blocks" {
            for want in KV_BLOCKS_ENTRIES {
                assert!(entries.contains(&want), "kv_blocks.cu: kernel {want} missing from {entries:?}");
            }
        }

        let asm = Command::new(&tools.ptxas)
            .arg(format!("-arch={SM}"))
            .arg("-v")
            .arg(&ptx)
            .arg("-o")
            .arg(&cubin)
            .output()
            .expect("run ptxas");
        let log = format!("{}{}", String::from_utf8_lossy(&asm.stdout), String::from_utf8_lossy(&asm.stderr));
        assert!(asm.status.success(), "ptxas -arch={SM} failed on {stem}.ptx:\n{log}");
        let stats = parse_ptxas(&log);
        assert_eq!(
            stats.len(),
            entries.len(),
            "{stem}: ptxas reported {} kernels, PTX has {}:\n{log}",
            stats.len(),
            entries.len()
        );
        say(&format!(
            "{stem}.cu: {} ({} bytes of PTX) -> {SM} cubin ok, {} kernels",
            nvrtc_version(&nvrtc.stdout),
            ptx_text.len(),
            stats.len()
        ));
        for k in &stats {
            let f = |v: Option<u32>| v.map_or("?".to_string(), |v| v.to_string());
            say(&format!(
                "  {:<28} registers {:>3}  stack {:>3} B  spill stores {:>3} B  spill loads {:>3} B",
                k.name,
                f(k.registers),
                f(k.stack),
                f(k.spill_stores),
                f(k.spill_loads)
            ));
            assert!(k.registers.is_some(), "{stem}: no register count for {} in:\n{log}", k.name);
        }
    }
}

/// Set to `1` by `scripts/test.sh` after its set-up scripts: the tools they install are
/// then expected, and a missing one is a failure rather than a skip.
const REQUIRE_TOOLS: &str = "TANDEM_REQUIRE_TOOLS";

/// The tools cannot be used here, because `why`: fails the test when they are required
/// ([`REQUIRE_TOOLS`]), else says the test is skipped.
fn tools_missing(why: &str) {
    if std::env::var_os(REQUIRE_TOOLS).is_some_and(|v| v == "1") {
        panic!("{REQUIRE_TOOLS}=1, but the CUDA tools are not usable: {why}");
    }
    say(&format!("skipped: cuda_ptx: {why}"));
}

/// Writes straight to the process's stderr, past the test harness's capture, so the
/// skip reason and the register table show in a plain `cargo test`.
fn say(msg: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
}

fn nvrtc_version(stdout: &[u8]) -> String {
    String::from_utf8_lossy(stdout).trim().to_string()
}

#[test]
fn ptxas_log_parsing() {
    let log = "ptxas info    : 0 bytes gmem\n\
               ptxas info    : Compiling entry function 'gather_kv_blocks' for 'sm_80'\n\
               ptxas info    : Function properties for gather_kv_blocks\n\
               \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 18 registers, 400 bytes cmem[0]\n";
    let s = parse_ptxas(log);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].name, "gather_kv_blocks");
    assert_eq!(
        (s[0].registers, s[0].stack, s[0].spill_stores, s[0].spill_loads),
        (Some(18), Some(8), Some(4), Some(12))
    );
}
