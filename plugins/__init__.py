"""Built-in alignd plugins, one module each, loaded exactly like third-party ones (see ``alignd.feedback.manager``)."""
