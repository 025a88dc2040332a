# The least Vault (or OpenBao) policy for rotator's vault sink.
#
# Shown for the sink  {type: vault, mount: secret, path: apps/app/aws}  on a KV version 2 mount (the
# default): replace `secret` with your mount and `apps/app/aws` with your path, one set of blocks per sink.
# `rotator permissions` prints these paths for your own config. A test proves this file is enough: a token
# holding only this policy writes, reads, rolls back and renews itself.
#
#   vault policy write rotator deploy/vault-policy.hcl
#   vault write auth/approle/role/rotator token_policies=rotator ...       # or a Kubernetes auth role

# Read the current version and write a new one (check-and-set): "create" when the path is new.
path "secret/data/apps/app/aws" {
  capabilities = ["create", "read", "update"]
}

# Rollback when the path held nothing before the rotation: delete exactly the version rotator wrote.
path "secret/delete/apps/app/aws" {
  capabilities = ["update"]
}

# Record in the secret's custom_metadata which key id it holds and when rotator wrote it.
# Not needed with `record_metadata: false`.
path "secret/metadata/apps/app/aws" {
  capabilities = ["patch"]
}

# Look the token up and renew it before it expires. Vault's built-in `default` policy grants both; they
# are here for tokens created without it (-no-default-policy).
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}

# On a KV version 1 mount use this one block instead of the three `secret/...` blocks above:
#
# path "secret/apps/app/aws" {
#   capabilities = ["create", "read", "update", "delete"]
# }
