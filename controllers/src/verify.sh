# stackwarden verify: are the files of each bundle named below still what was pushed?
#
# Read-only. For each bundle, compares every file in the manifest its push left
# ($state/<bundle>.files: mode, sha256 and path) with the live file, and prints one line:
#   intact BUNDLE
#   drifted BUNDLE PATH<TAB>...  (changed, mode changed or missing)
#   unrecorded BUNDLE            (no manifest: installed by a push that wrote none)
#   absent BUNDLE                (never installed here)
#
# POSIX sh, as every script sent with AWS-RunShellScript (the SSM agent runs `sh -c FILE`).
set -u
root="${STACKWARDEN_ROOT:-}"
state="$root/var/lib/stackwarden"
tab=$(printf '\t')
for name in @BUNDLES@; do
  manifest="$state/$name.files"
  if [ ! -f "$manifest" ]; then
    if [ -f "$state/$name.sha256" ]; then echo "unrecorded $name"; else echo "absent $name"; fi
    continue
  fi
  changed=
  while read -r mode sum path; do
    live="$root$path"
    if [ ! -f "$live" ] \
      || [ "$(stat -c %a "$live")" != "$mode" ] \
      || [ "$(sha256sum < "$live" | cut -d' ' -f1)" != "$sum" ]; then
      changed="${changed:+$changed$tab}$path"
    fi
  done < "$manifest"
  if [ -z "$changed" ]; then
    echo "intact $name"
  else
    echo "drifted $name $changed"
  fi
done
