"""Operations: the Prometheus metrics endpoint and systemd's sd_notify protocol."""
