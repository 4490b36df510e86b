"""The inspection service: A/B classification, stored predictions and labels, pages."""
