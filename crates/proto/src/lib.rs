//! The gRPC control plane: the schemas of proto/tessera.proto, generated at build time, and
//! [`secure`], its TLS and authorization, trusted from the cluster secret.

pub mod secure;

tonic::include_proto!("tessera.v1");

/// Bumped on any incompatible change; a peer of another version is refused at registration.
pub const PROTOCOL_VERSION: u32 = 6;

/// HTTP/2 flow-control window for the step stream (both directions): a step's logits (4 bytes
/// x vocabulary slice x sequences) in one window.
pub const STREAM_WINDOW: u32 = 16 << 20;
