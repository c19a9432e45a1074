//! Compiles `arl/v1/*.proto` and `arl/sidecar/agent.proto` with protox (pure Rust, no `protoc` to install) and generates the
//! tonic server and client.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["arl/v1/sessions.proto", "arl/sidecar/agent.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let files = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(files)?;
    Ok(())
}
