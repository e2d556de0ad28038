"""Adapters to trainers users already run (Hugging Face Trainer and TRL). Each imports its framework only here."""
