//! The gRPC control plane: the schemas of proto/tessera.proto, generated at build time, and
//! [`secure`], its TLS and authorization, trusted from the cluster secret.

pub mod secure;

tonic::include_proto!("tessera.v1");

impl HeldShard {
    /// What a worker holds once it has loaded `a` (its weight bytes as it reported them): the
    /// worker's own record, which it tells a coordinator it registers with, and the
    /// coordinator's of it.
    pub fn of(a: &Assignment, weight_bytes_per_token: u64, weight_bytes_held: u64) -> HeldShard {
        HeldShard {
            mesh_id: a.mesh_id,
            config_json: a.config_json.clone(),
            spec_json: a.spec_json.clone(),
            model_sha256: a.model_sha256.clone(),
            exact: a.exact,
            wire: a.wire.clone(),
            peers: a.peers.clone(),
            weight_bytes_per_token,
            weight_bytes_held,
            kv_cache: a.kv_cache.clone(),
        }
    }
}

/// Bumped on any incompatible change; a peer of another version is refused at registration.
pub const PROTOCOL_VERSION: u32 = 6;

/// HTTP/2 flow-control window for the step stream (both directions): a step's logits (4 bytes
/// x vocabulary slice x sequences) in one window.
pub const STREAM_WINDOW: u32 = 16 << 20;
