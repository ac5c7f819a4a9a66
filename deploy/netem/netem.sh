#!/usr/bin/env bash
# An emulated network on one Linux machine: the coordinator and each worker in its own network
# namespace, every namespace joined to a router namespace by a veth pair, each link shaped to
# RATE (htb, both directions) and DELAY_US of one-way latency (the netdelay relay: the router
# sends every packet it forwards through a TUN device, and netdelay hands it back DELAY_US
# later; this kernel has no netem). Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN).
#
#   netem.sh up N RATE DELAY_US          namespaces for a coordinator and N workers
#   netem.sh cluster MODEL [ARGS...]     start the coordinator (ARGS added) and the workers in
#                                        them; prints the coordinator's address when ready
#   netem.sh exec NAME CMD...            run CMD in namespace NAME (c, w1, w2, ..., r)
#   netem.sh cut I J on|off              drop (silently, both ways) or pass again every packet
#                                        between workers I and J: a stall of their link alone,
#                                        the coordinator still reaches both
#   netem.sh rtt                         UDP round trips worker 1 -> coordinator (python3):
#                                        what the links and the relay really add
#   netem.sh down                        stop everything, delete the namespaces
#
# Environment: TESSERA (the tessera binary, default target/release/tessera), NETDELAY (the
# relay, default target/release/examples/netdelay), NETEM_PREFIX (namespace names, default
# tsn), NETEM_STATE (pids and settings, default /tmp/$NETEM_PREFIX), TESSERA_TOKEN.
# Addresses: coordinator 10.77.0.2 (gRPC port 7060), worker i 10.77.i.2 (7070 gRPC, 7071 QUIC).
set -euo pipefail

here=$(cd "$(dirname "$0")/../.." && pwd)
P=${NETEM_PREFIX:-tsn}
STATE=${NETEM_STATE:-/tmp/$P}
TESSERA=${TESSERA:-$here/target/release/tessera}
NETDELAY=${NETDELAY:-$here/target/release/examples/netdelay}
TOKEN=${TESSERA_TOKEN:-netem-cluster-token}

ns() { if [ "$1" = c ]; then echo "$P-c"; elif [ "$1" = r ]; then echo "$P-r"; else echo "$P-$1"; fi; }
inx() { local n; n=$(ns "$1"); shift; ip netns exec "$n" "$@"; }

shape() { # namespace device rate
  inx "$1" tc qdisc replace dev "$2" root handle 1: htb default 1 r2q 1000
  inx "$1" tc class replace dev "$2" parent 1: classid 1:1 htb rate "$3" burst 64k cburst 64k
}

up() {
  local n=$1 rate=$2 delay=$3
  down >/dev/null 2>&1 || true
  mkdir -p "$STATE"
  echo "$n" > "$STATE/workers"
  ip netns add "$(ns r)"
  inx r ip link set lo up
  inx r sysctl -qw net.ipv4.ip_forward=1
  inx r sysctl -qw net.ipv4.conf.all.rp_filter=0
  inx r sysctl -qw net.ipv4.conf.default.rp_filter=0
  inx r ip tuntap add dev dly mode tun
  inx r ip link set dly up
  inx r sysctl -qw net.ipv4.conf.dly.rp_filter=0
  inx r sysctl -qw net.ipv4.conf.dly.accept_local=1
  inx r ip route add default dev dly table 100
  for i in $(seq 0 "$n"); do
    local name; if [ "$i" = 0 ]; then name=c; else name=w$i; fi
    ip netns add "$(ns $name)"
    inx $name ip link set lo up
    ip link add "$P-v$i" netns "$(ns r)" type veth peer name e0 netns "$(ns $name)"
    inx r ip addr add "10.77.$i.1/24" dev "$P-v$i"
    inx r ip link set "$P-v$i" up
    inx r sysctl -qw "net.ipv4.conf.$P-v$i.rp_filter=0"
    inx $name ip addr add "10.77.$i.2/24" dev e0
    inx $name ip link set e0 up
    inx $name ip route add default via "10.77.$i.1"
    # Forwarded packets from this link go through the delay relay first.
    inx r ip rule add iif "$P-v$i" lookup 100
    if [ "$rate" != none ]; then
      shape r "$P-v$i" "$rate"
      shape $name e0 "$rate"
    fi
  done
  inx r "$NETDELAY" dly "$delay" > "$STATE/netdelay.log" 2>&1 &
  echo $! > "$STATE/netdelay.pid"
  echo "$rate $delay" > "$STATE/link"
}

cluster() {
  local model=$1; shift
  local n; n=$(cat "$STATE/workers")
  TESSERA_TOKEN=$TOKEN inx c "$TESSERA" coordinator --model "$model" --listen 10.77.0.2:7060 \
    --workers "$n" "$@" > "$STATE/coordinator.log" 2>&1 &
  echo $! > "$STATE/coordinator.pid"
  # The machine's cores shared out, as `tessera run` does; no spinning where workers share.
  local cores threads spin=1000
  cores=$(nproc)
  threads=$(( cores / n )); [ "$threads" -ge 1 ] || threads=1
  [ $(( threads * n )) -le "$cores" ] || spin=0
  for i in $(seq 1 "$n"); do
    TESSERA_SPIN_US=${TESSERA_SPIN_US:-$spin} TESSERA_TOKEN=$TOKEN inx "w$i" "$TESSERA" worker \
      --threads "$threads" --coordinator 10.77.0.2:7060 \
      --listen "10.77.$i.2:7070" --quic-listen "10.77.$i.2:7071" --name "w$i" \
      > "$STATE/worker$i.log" 2>&1 &
    echo $! > "$STATE/worker$i.pid"
  done
  for _ in $(seq 1 600); do
    if TESSERA_TOKEN=$TOKEN inx c "$TESSERA" status --coordinator 10.77.0.2:7060 2>/dev/null \
        | grep -q '^cluster: ready'; then
      echo 10.77.0.2:7060
      return 0
    fi
    sleep 0.5
  done
  echo "the cluster did not become ready; logs in $STATE" >&2
  tail -5 "$STATE"/*.log >&2
  return 1
}

down() {
  for f in "$STATE"/*.pid; do
    [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  sleep 0.2
  for f in "$STATE"/*.pid; do
    [ -e "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  for n in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
    ip netns pids "$n" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$n"
  done
}

cut() { # worker worker on|off
  local a=10.77.$1.2 b=10.77.$2.2 op
  case "$3" in on) op=add ;; off) op=del ;; *) echo "cut: on or off, not $3" >&2; return 2 ;; esac
  # Looked up before the delay relay's rule (and again for packets the relay hands back).
  inx r ip rule "$op" from "$a" to "$b" blackhole pref 10
  inx r ip rule "$op" from "$b" to "$a" blackhole pref 11
}

rtt() {
  inx c python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("10.77.0.2", 7999))
while True:
    d, a = s.recvfrom(4096)
    if d == b"stop": break
    s.sendto(d, a)' &
  local echo=$!
  sleep 0.3
  inx w1 python3 -c '
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
t = []
for i in range(300):
    t0 = time.perf_counter(); s.sendto(b"x" * 64, ("10.77.0.2", 7999)); s.recv(4096)
    t.append((time.perf_counter() - t0) * 1e6)
    time.sleep(0.002)
s.sendto(b"stop", ("10.77.0.2", 7999))
t.sort(); print("UDP round trip w1 -> c: p50 %.0f us, p90 %.0f us" % (t[150], t[270]))'
  wait "$echo" 2>/dev/null || true
}

case "${1:-}" in
  up) shift; up "$@" ;;
  cluster) shift; cluster "$@" ;;
  exec) shift; name=$1; shift; inx "$name" "$@" ;;
  cut) shift; cut "$@" ;;
  rtt) rtt ;;
  down) down ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
