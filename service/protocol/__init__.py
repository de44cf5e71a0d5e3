"""The protocol-neutral session layer: what every front (gRPC today, the Open Inference
Protocol later) shares. Fronts translate their wire messages to and from `messages`; this
package does attach, dispatch, sequence numbers and duplicates, StreamMulti rounds, in-band
versus stream-level errors and the drain hand-over. No gRPC and no protobuf here."""
