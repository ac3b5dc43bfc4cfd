# mcp-tunnel %post ($1: 1 = install, 2 = upgrade). What debhelper does for the .deb:
# create the user and the state directory, enable per preset on first install,
# reload systemd. Never starts the service: it waits for its configuration.
echo "mcp-tunnel: %post ($1): sysusers, tmpfiles, preset"
systemd-sysusers /usr/lib/sysusers.d/mcp-tunnel.conf || :
systemd-tmpfiles --create /usr/lib/tmpfiles.d/mcp-tunnel.conf || :
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset mcp-tunnel.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ ! -e /var/lib/mcp-tunnel/tunnel-token ]; then
    echo "mcp-tunnel: installed, not started yet: see /usr/share/doc/mcp-tunnel/PACKAGING.md"
fi
