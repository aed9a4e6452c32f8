"""Cross-cutting helpers shared by every component."""
