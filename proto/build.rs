//! Generates the tonic clients and servers for `tandem.v1` and `tandem.worker.v1`,
//! and the encoded file descriptor set that server reflection serves.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate, so a build needs no system
//! package; an explicit `PROTOC` in the environment still wins.

use std::path::PathBuf;

const PROTOS: &[&str] = &["tandem/v1/generate.proto", "tandem/worker/v1/worker.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // Safe: build scripts are single-threaded at this point.
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("tandem_descriptor.bin"))
        // Undecodable requests (e.g. invalid UTF-8) are INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::codec::TandemCodec")
        .compile_protos(PROTOS, &["."])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
