//! The generated Protobuf types and tonic stubs of `roomcontrol.v1`, and the descriptor set
//! that server reflection serves (so grpcurl can `list` and `describe` without the .proto file).
//!
//! Generated code and the constants that name it: no logic lives here, and it depends on no
//! other module.

#![allow(missing_docs)]

tonic::include_proto!("roomcontrol.v1");
// The server, generated apart so that `Events` streams yield encoded events (see build.rs).
include!(concat!(env!("OUT_DIR"), "/server/roomcontrol.v1.rs"));
include!(concat!(env!("OUT_DIR"), "/room_control_methods.rs"));

/// The path prefix of every RoomControl method (`/roomcontrol.v1.RoomControl/Join`...).
pub const ROOM_CONTROL_PATH: &str = "/roomcontrol.v1.RoomControl/";

/// Encoded `FileDescriptorSet` of `room_control.proto` and its imports, with source comments.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("roomcontrol_descriptor");
