"""Capture: cameras (USB, file, folder, HTTP, RTSP) feeding one bounded frame queue, from
which the agent takes micro-batches across cameras."""
