"""The loader template and its children: resolve (hub metadata first), download, load
with transformers, quantize, place into arenas and device segments, price estimates."""
