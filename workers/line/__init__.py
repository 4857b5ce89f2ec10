"""The line's logic past the crops: scoring views, joining a product's views, shadow comparison."""
