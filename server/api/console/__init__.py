"""The supervisor console (server-rendered pages on the HTTP side) and the compliance report
it shares with `voxauth report`."""
