# A stand-in for the few functions of nixpkgs' `lib` that the rendered modules call.
#
# nixpkgs is not available on our machines, so the tests cannot evaluate a rendered
# module inside a real NixOS configuration. Instead they call the module function
# with this `lib` and a hand-made `config` and read what it sets: the values the
# module computes (unit conditions, paths, flags, scripts) are real evaluations of
# the rendered file. What only the NixOS module system does (merging definitions,
# priorities, option types) is not modelled: mkDefault, mkForce and mkIf return
# marked values like nixpkgs' own, which the tests unwrap (tests/nixeval.py).
#
# Each function here behaves like its nixpkgs namesake for the inputs the modules
# give it; escapeShellArg quotes every argument (nixpkgs leaves safe words bare:
# the same word to a shell).
let
  override = priority: content: { _type = "override"; inherit priority content; };
  stringsAfter = prefix: s:
    builtins.substring (builtins.stringLength prefix) (builtins.stringLength s) s;
in
{
  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: { _type = "option"; default = false; description = name; };
  types = {
    str = "str";
    bool = "bool";
    int = "int";
    path = "path";
    anything = "anything";
    listOf = t: { listOf = t; };
    nullOr = t: { nullOr = t; };
    attrsOf = t: { attrsOf = t; };
    enum = values: { enum = values; };
    ints.between = lo: hi: { between = [ lo hi ]; };
  };

  mkOverride = override;
  mkDefault = override 1000;
  mkForce = override 50;
  mkIf = condition: content: { _type = "if"; inherit condition content; };

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };
  optionalString = cond: s: if cond then s else "";
  mapAttrs = builtins.mapAttrs;
  escapeShellArg = arg: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg) + "'";
  escapeShellArgs = args: builtins.concatStringsSep " " (map (arg:
    "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg) + "'") args);
  removePrefix = prefix: s:
    if builtins.substring 0 (builtins.stringLength prefix) s == prefix then stringsAfter prefix s else s;
  versions.majorMinor = v:
    let parts = builtins.splitVersion v; in "${builtins.elemAt parts 0}.${builtins.elemAt parts 1}";
}
