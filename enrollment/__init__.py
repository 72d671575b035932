"""Turning enrollment audio into a voiceprint, and the HR workflow's client side."""
