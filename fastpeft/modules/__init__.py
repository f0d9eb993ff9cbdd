"""nn.Module layers built on the fused ops."""
