//! Generates the tonic code from proto/backer/v1/*.proto with protox, a
//! protobuf compiler in Rust, so building needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/backer/v1/backer.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Chunk payloads move as `Bytes`, without a copy per message.
        .bytes(".backer.v1")
        .compile_fds(fds)?;
    Ok(())
}
