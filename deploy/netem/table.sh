#!/usr/bin/env bash
# README's emulated-network table: decode and prefill tok/s, communication share and mean
# all-reduce for N = 1, 2, 4 workers over loopback and three emulated links, with f32 and q8
# partial sums on the wire. Prints one JSON object per configuration.
#   deploy/netem/table.sh MODEL [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
model=$1; runs=${2:-1}
tessera=${TESSERA:-$here/target/release/tessera}
export TESSERA_TOKEN=${TESSERA_TOKEN:-netem-table-token}
row() { # profile workers wire json
  python3 -c 'import json,sys; d=json.loads(sys.argv[4]); print(json.dumps({"link": sys.argv[1], "workers": int(sys.argv[2]), "wire": sys.argv[3], **{k: d[k] for k in ["prefill_tok_s","decode_tok_s","comm_share","allreduce_mean_us","logits_bytes_per_step"]}}))' "$@"
}
for wire in ${LOOPBACK_WIRES-f32 q8}; do
  for n in 1 2 4; do
    j=$("$tessera" bench --model "$model" --workers "$n" --wire "$wire" --runs "$runs" \
        --bandwidth-mib 64 --json 2>/dev/null | tail -1)
    row loopback "$n" "$wire" "$j"
  done
done
# The relay needs a core to forward packets on time: workers that spin on the socket would
# starve it on a small machine, so they sleep here.
export TESSERA_SPIN_US=0
for link in "10gbit 50" "1gbit 200" "100mbit 2000"; do
  set -- $link
  for wire in f32 q8; do
    for n in 1 2 4; do
      "$here/deploy/netem/netem.sh" up "$n" "$1" "$2"
      addr=$("$here/deploy/netem/netem.sh" cluster "$model" --wire "$wire")
      j=$("$here/deploy/netem/netem.sh" exec c "$tessera" bench --coordinator "$addr" \
          --runs "$runs" --json 2>/dev/null | tail -1)
      row "$1+${2}us" "$n" "$wire" "$j"
      "$here/deploy/netem/netem.sh" down
    done
  done
done
