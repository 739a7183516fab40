"""The Step-3 model itself: config, the weight declaration, layers, MFA attention, MoE, quantized
weights, the KV cache, the forward pass and the sharding rules table."""
