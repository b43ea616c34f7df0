//! Compiles `gpo/v1/gpo.proto` with protox (pure Rust: no system protoc) and generates the
//! prost messages and tonic client and server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=gpo/v1/gpo.proto");
    let fds = protox::compile(["gpo/v1/gpo.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
