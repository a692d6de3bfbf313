"""Box machinery: anchors, SSD box coding, matching, the multibox loss and post-processing."""
