//! The gRPC schemas of proto/tessera.proto, generated at build time.

tonic::include_proto!("tessera.v1");

/// Bumped on any incompatible change; a peer of another version is refused at registration.
pub const PROTOCOL_VERSION: u32 = 5;
