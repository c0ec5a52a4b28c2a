#!/bin/sh
cat "${GREETING_FILE:-/srv/greeting.txt}"
