"""A seconds-sized autoencoder config shared by the weight-file and input-check tests."""
from tfusion.autoencoders import AutoencoderConfig

TINY_AUTOENCODER = AutoencoderConfig(block_out_channels=(8, 16), layers_per_block=1,
                                     latent_channels=4, norm_num_groups=4, shift_factor=0.1,
                                     num_vq_embeddings=8)
