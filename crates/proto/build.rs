fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, so `cargo build` needs nothing installed on the machine.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=../../proto/tessera.proto");
    tonic_prost_build::configure()
        .compile_protos(&["../../proto/tessera.proto"], &["../../proto"])?;
    Ok(())
}
