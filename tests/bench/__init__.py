"""The benchmark's parts: the replay source and the side-by-side with the official client."""
