//! Compiles `gpo/v1/gpo.proto` with protox (pure Rust: no system protoc) and generates the
//! prost messages and tonic client and server; then `gpo/v1/serve.proto` (same package, its
//! own output folder and module, and a codec that refuses malformed messages as
//! INVALID_ARGUMENT).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=gpo/v1/gpo.proto");
    println!("cargo:rerun-if-changed=gpo/v1/serve.proto");
    let fds = protox::compile(["gpo/v1/gpo.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("serve");
    std::fs::create_dir_all(&out)?;
    let fds = protox::compile(["gpo/v1/serve.proto"], ["."])?;
    tonic_prost_build::configure()
        .out_dir(&out)
        .codec_path("crate::serve_codec::ServeCodec")
        .compile_fds(fds)?;
    Ok(())
}
