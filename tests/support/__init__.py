"""Helpers the unit and integration tests share: fake time, certificates, replica comparison, fake agents."""
