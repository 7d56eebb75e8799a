#!/bin/sh
# Entrypoint of the example sandbox image: start tunnel-agent in the background, then run the
# sandbox's own command (the image's CMD, or what `docker run` gives) in the foreground.
#
# The agent always dials the edge with TLS (--tls): the edge is remote, and the agent refuses
# plaintext to anything but loopback. Settings, all from the environment (README.md here):
#   TUNNEL_AGENT_SERVER, TUNNEL_AGENT_SANDBOX_ID   read by tunnel-agent itself (required)
#   TUNNEL_AGENT_TOKEN                              read by tunnel-agent itself; when unset, the
#   TUNNEL_AGENT_TOKEN_FILE                         file here (default /run/secrets/tunnel-agent-token)
#   TUNNEL_AGENT_TLS_CA                             a private CA's bundle (--tls-ca)
#   TUNNEL_AGENT_TLS_SERVER_NAME                    the name the edge's certificate carries, when it
#                                                   is not the host in TUNNEL_AGENT_SERVER
#   TUNNEL_AGENT_LOG_LEVEL                          read by tunnel-agent itself
#   TUNNEL_AGENT_ARGS                               more arguments for `tunnel-agent run`, split
#                                                   on whitespace (e.g. "--api-port 3001")
#
# The agent reconnects to the edge by itself; run the container with `--init` (or another init
# as PID 1) so that it is reaped and gets the container's SIGTERM.

start_agent() {
    set -- run --tls
    if [ -n "${TUNNEL_AGENT_TLS_CA:-}" ]; then
        set -- "$@" --tls-ca "$TUNNEL_AGENT_TLS_CA"
    fi
    if [ -n "${TUNNEL_AGENT_TLS_SERVER_NAME:-}" ]; then
        set -- "$@" --tls-server-name "$TUNNEL_AGENT_TLS_SERVER_NAME"
    fi
    token_file=${TUNNEL_AGENT_TOKEN_FILE:-/run/secrets/tunnel-agent-token}
    if [ -z "${TUNNEL_AGENT_TOKEN:-}" ] && [ -r "$token_file" ]; then
        set -- "$@" --token-file "$token_file"
    fi
    set -f # split TUNNEL_AGENT_ARGS on whitespace, but never expand a glob in it
    # shellcheck disable=SC2086
    set -- "$@" ${TUNNEL_AGENT_ARGS:-}
    set +f
    tunnel-agent "$@" &
}

start_agent
exec "$@"
