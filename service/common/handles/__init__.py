"""What loaders and workers share about a handle: the descriptor, the arena's layout,
devices and CUDA VMM segments, the CPU repack switch."""
