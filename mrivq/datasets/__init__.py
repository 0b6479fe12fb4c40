"""The dataset catalogue (cards), fetching with verification, dataset layouts, and the phantoms."""
