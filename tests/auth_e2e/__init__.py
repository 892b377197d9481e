"""End-to-end authentication: a real OAuth 2.0 authorization server (authlib on Flask, served
by werkzeug on loopback) issuing RFC 9068 access tokens to the example gateway and to
``OAuth2Middleware``, including key rotation and identity-provider outages."""
