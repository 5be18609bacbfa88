-- Prosody with hmacfs: mod_http_upload_external (prosody-modules; Debian:
-- apt install prosody-modules).  Add to /etc/prosody/prosody.cfg.lua (or a
-- file in /etc/prosody/conf.d/), then: prosodyctl check && prosodyctl reload
--
-- The secret is the one in /etc/hmac-file-server/secret (SecretFile) or
-- Secret in /etc/hmac-file-server/config.toml, character for character.
-- The base URL is nginx's https address plus UploadSubDir, ending in "/".
-- Load it as a component, not through modules_enabled.

-- Protocol v2 (recommended): the MAC binds path, size and Content-Type.
Component "upload.example.org" "http_upload_external"
    http_upload_external_base_url = "https://upload.example.org/upload/"
    http_upload_external_secret = "paste the secret here"
    http_upload_external_protocol = "v2"
    -- Bytes; keep it <= MaxUploadSize (1GiB = 1073741824) and nginx's client_max_body_size.
    http_upload_external_file_size_limit = 104857600

-- Protocol v1 (the module's default, and what older setups use): the MAC
-- binds path and size only.  Use this block instead of the one above.
--
-- Component "upload.example.org" "http_upload_external"
--     http_upload_external_base_url = "https://upload.example.org/upload/"
--     http_upload_external_secret = "paste the secret here"
--     http_upload_external_protocol = "v1"
--     http_upload_external_file_size_limit = 104857600

-- Let your users find the component: on the VirtualHost, e.g.
--   disco_items = { { "upload.example.org", "file uploads" } }
-- (or make upload.example.org a subdomain of the host, which Prosody lists itself).
