#!/usr/bin/env bash
# The containers' HEALTHCHECK. It checks what the gpo binary offers today:
#  - GPO_HEALTH_URL set (e.g. http://127.0.0.1:9464/healthz): that URL must answer 2xx.
#    The /healthz and /readyz endpoints are pending (issue 10 §2); set it once they exist.
#  - a coordinator: `gpo status` against its own gRPC address (--listen / GPO_LISTEN) must
#    answer.
#  - a worker: its process must exist and not be stopped (SIGSTOP) or a zombie. A worker has
#    no health endpoint yet, and its ring port must NOT be probed: the ring accepts the
#    first connection as its predecessor, so a probe during ring setup fails the step.
set -euo pipefail

if [ -n "${GPO_HEALTH_URL:-}" ]; then
  exec curl -fsS -o /dev/null --max-time 4 "$GPO_HEALTH_URL"
fi

# Find the gpo process (PID 1 is tini) and its subcommand and flags.
pid=""
for p in /proc/[0-9]*; do
  if [ "$(cat "$p/comm" 2>/dev/null)" = gpo ]; then pid=${p#/proc/}; break; fi
done
[ -n "$pid" ] || { echo "no gpo process" >&2; exit 1; }
mapfile -d '' args <"/proc/$pid/cmdline"
state=$(awk '/^State:/ {print $2}' "/proc/$pid/status")
case "$state" in
  T | t | Z) echo "gpo (pid $pid) is in state $state" >&2; exit 1 ;;
esac

role="" listen="${GPO_LISTEN:-}"
for ((i = 1; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    coordinator | worker | train) [ -n "$role" ] || role=${args[$i]} ;;
    --listen) listen=${args[$((i + 1))]:-} ;;
    --listen=*) listen=${args[$i]#--listen=} ;;
  esac
done

if [ "$role" = coordinator ]; then
  listen=${listen:-127.0.0.1:50051}
  port=${listen##*:}
  host=${listen%:*}
  # A wildcard bind is reached on loopback.
  case "$host" in 0.0.0.0 | "[::]" | "") host=127.0.0.1 ;; esac
  exec gpo status --coordinator "http://$host:$port" >/dev/null
fi
exit 0
