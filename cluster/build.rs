//! Generates the etcd v3 client (the subset in `proto/etcd.proto`) with the vendored
//! `protoc`, so the build needs no system package; an explicit `PROTOC` still wins.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // Safe: build scripts are single-threaded at this point.
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure().build_server(false).compile_protos(&["proto/etcd.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/etcd.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    Ok(())
}
