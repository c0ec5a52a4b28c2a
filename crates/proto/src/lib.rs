//! Generated gRPC and protobuf types for kiln's API (`proto/`). No logic lives here.

pub mod definition {
    tonic::include_proto!("kiln.definition.v1");
}
pub mod control {
    tonic::include_proto!("kiln.control.v1");
}
pub mod session {
    tonic::include_proto!("kiln.session.v1");
}
