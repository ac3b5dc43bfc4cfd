# mcp-tunnel %preun ($1: 0 = removal, 1 = upgrade): on removal, stop and disable.
echo "mcp-tunnel: %preun ($1)"
if [ "$1" -eq 0 ]; then
    systemctl --no-reload disable --now mcp-tunnel.service >/dev/null 2>&1 || :
fi
