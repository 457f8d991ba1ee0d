//! Compiles `proto/` without a system `protoc`: protox parses the files in Rust and
//! tonic-prost-build generates messages, clients and servers from the descriptors.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not when it was compiled: a build cache shared by
    // checkouts at other paths reuses the compiled script.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "mailmesh/v1/queue.proto",
        "mailmesh/v1/storage.proto",
        "mailmesh/v1/auth.proto",
    ];
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".mailmesh.v1.Body.inline")
        .compile_fds(fds)?;
    Ok(())
}
