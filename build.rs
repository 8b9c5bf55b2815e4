//! Compiles the public proto with protox (pure Rust, so no system `protoc` is needed), generates
//! the tonic server and client, and writes the encoded descriptor set that reflection serves.
//!
//! The messages and the client are generated as usual. The server is generated apart, naming
//! the messages from `crate::pb` and `Event` as [`EncodedEvent`](crate::codec::EncodedEvent):
//! an `Events` stream yields an event encoded once for all the streams that deliver it (wire
//! bytes identical to an `Event`'s). A third server, the plain one with `Event` messages, is for
//! the benchmark's minimal tonic baseline only (`benches/`), and compiles only there.
//!
//! It also writes the list of RoomControl's methods, read from the service descriptor, so the
//! rules that apply to every call (load shedding, deadlines, metrics, the access line) follow
//! the proto instead of a list someone must remember to extend.

use std::fmt::Write;
use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO: &str = "proto/roomcontrol/v1/room_control.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox and compile_fds emit no rerun hints of their own.
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([PROTO], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("roomcontrol_descriptor.bin"), fds.encode_to_vec())?;
    fs::write(out.join("room_control_methods.rs"), methods(&fds)?)?;
    tonic_prost_build::configure()
        .build_server(false)
        .codec_path("crate::codec::CompactCodec")
        .compile_fds(fds.clone())?;
    let servers = [
        ("server", "crate", Some("crate::codec::EncodedEvent")),
        ("baseline", "::roomctl", None),
    ];
    for (dir, root, event) in servers {
        let dir = out.join(dir);
        fs::create_dir_all(&dir)?;
        let mut builder = tonic_prost_build::configure()
            .build_client(false)
            .out_dir(dir)
            .codec_path(format!("{root}::codec::CompactCodec"))
            .extern_path(".roomcontrol.v1", format!("{root}::pb"));
        if let Some(event) = event {
            builder = builder.extern_path(".roomcontrol.v1.Event", event);
        }
        builder.compile_fds(fds.clone())?;
    }
    Ok(())
}

/// The `ROOM_CONTROL_METHODS` constant: every method of `roomcontrol.v1.RoomControl`, in the
/// proto's order.
fn methods(fds: &prost_types::FileDescriptorSet) -> Result<String, Box<dyn std::error::Error>> {
    let service = fds
        .file
        .iter()
        .filter(|file| file.package() == "roomcontrol.v1")
        .flat_map(|file| &file.service)
        .find(|service| service.name() == "RoomControl")
        .ok_or("roomcontrol.v1.RoomControl is not in the proto")?;
    let mut code = String::from(
        "/// Every method of `roomcontrol.v1.RoomControl`, in the proto's order (generated from \
         the\n/// service descriptor by build.rs).\npub const ROOM_CONTROL_METHODS: &[&str] = &[\n",
    );
    for method in &service.method {
        writeln!(code, "    {:?},", method.name())?;
    }
    code.push_str("];\n");
    Ok(code)
}
