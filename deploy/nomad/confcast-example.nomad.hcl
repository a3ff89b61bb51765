# An application whose configuration version comes from confcast's index in Consul.
#
# The relay of datacenter dc1, started with `relay --consul http://consul:8500`, keeps
#   confcast/dc1/configurations/services/<name>/<version> = <branch>/<commit>
# in Consul (`latest` for a branch head, otherwise the tag the datacenter pins). Nomad's
# template runner watches that key with a blocking query: a `git push` that changes
# what dc1 runs for service0 rewrites the key, the template is rendered again and the
# task gets SIGHUP.
#
# The files themselves reach the host through the confcast subscriber
# (`subscriber --dc dc1 --service service0 --dir /etc/confcast`), which swaps
# /etc/confcast/service0 atomically. The relay writes the key once it has published the
# update, not once every host has applied it, so the HUP can reach the task a moment
# before its host has switched: an application that must reload exactly the new files
# is better told by the subscriber itself (`--signal HUP --pidfile ...` or `--exec`).
# The key suits what only needs the version: rendering it, or reloading other state.
#
# Nomad starts every task of a job at once when the key changes; `splay` spreads the
# signals over a few seconds so a push does not reload the whole fleet together.

job "confcast-example" {
  datacenters = ["dc1"]
  type        = "service"

  group "app" {
    count = 3

    task "app" {
      driver = "exec"

      config {
        command = "/usr/local/bin/app"
        args    = ["--config", "/etc/confcast/service0", "--version-file", "local/confcast-version"]
      }

      template {
        # "<branch>/<commit>" of the configuration dc1 runs for service0.
        data          = <<-EOT
          {{ key "confcast/dc1/configurations/services/service0/latest" }}
        EOT
        destination   = "local/confcast-version"
        change_mode   = "signal"
        change_signal = "SIGHUP"
        splay         = "5s"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
