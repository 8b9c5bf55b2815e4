//! Compiles the public proto with protox (pure Rust, so no system `protoc` is needed), generates
//! the tonic server and client, and writes the encoded descriptor set that reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO: &str = "proto/roomcontrol/v1/room_control.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox and compile_fds emit no rerun hints of their own.
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([PROTO], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("roomcontrol_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::CompactCodec")
        .compile_fds(fds)?;
    Ok(())
}
