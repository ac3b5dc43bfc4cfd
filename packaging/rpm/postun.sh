# mcp-tunnel %postun ($1: 0 = removal, 1 = upgrade): reload systemd; after an
# upgrade restart the service if it was running. /var/lib/mcp-tunnel is kept.
echo "mcp-tunnel: %postun ($1)"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart mcp-tunnel.service >/dev/null 2>&1 || :
    fi
fi
