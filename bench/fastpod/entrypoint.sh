#!/bin/sh
# nginx reads no environment: write $PORT into its config, then become it (PID 1, so SIGTERM reaches it).
set -e
sed "s/@PORT@/${PORT:-8080}/" /etc/hms-fast/nginx.conf.in > /tmp/nginx.conf
exec /usr/sbin/nginx -e stderr -c /tmp/nginx.conf -g 'daemon off;'
