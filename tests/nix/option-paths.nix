# The option paths that rendered NixOS modules set, as lists of attribute names
# (tests/test_nixos_options.py). There is no nixpkgs here: `lib` is a stand-in with
# the few functions the templates call; mkIf/mkForce/mkDefault/mkBefore wrap their
# content so that the walk below sees through them. Option declarations (`options`)
# are never evaluated. A template that calls a lib function missing here fails with
# "attribute '<name>' missing": add it below.
# `top` is the module walked (a hosts/<host>.nix, or an installer's iso.nix); `host` the
# hosts/<host>.nix whose k3scluster.* values the modules read.
{ top, host ? null, renderDir }:
let
  b = builtins;
  wrap = type: content: { _type = type; inherit content; };
  lib = {
    mkForce = wrap "override";
    mkDefault = wrap "override";
    mkOverride = _: wrap "override";
    mkBefore = wrap "order";
    mkAfter = wrap "order";
    mkOrder = _: wrap "order";
    mkIf = _: wrap "if";
    mkMerge = contents: { _type = "merge"; inherit contents; };
    optionalAttrs = c: a: if c then a else { };
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
    optionalString = c: s: if c then s else "";
    mapAttrs = b.mapAttrs;
    mapAttrs' = f: s: b.listToAttrs (map (n: f n s.${n}) (b.attrNames s));
    nameValuePair = name: value: { inherit name value; };
    listToAttrs = b.listToAttrs;
    concatStringsSep = b.concatStringsSep;
    replaceStrings = b.replaceStrings;
    toLower = s: s;
    escapeShellArg = s: "'${s}'";
    escapeShellArgs = l: b.concatStringsSep " " (map (s: "'${s}'") l);
    removePrefix = p: s:
      if b.substring 0 (b.stringLength p) s == p
      then b.substring (b.stringLength p) (-1) s else s;
    versions.majorMinor = v: v;
    mkOption = x: x;
    mkEnableOption = x: x;
    types = { };
  };
  inRender = p: b.substring 0 (b.stringLength renderDir) (toString p) == renderDir;
  call = m: args: if b.isFunction m then m args else m;
  load = p: call (import p);

  hostDefs = if host == null then { } else load host { modulesPath = "/modules"; };
  # k3scluster.* as the module system would see it: the host file's values over the
  # defaults the render's modules declare (`mkOption` above returns its arguments)
  isOption = v: b.isAttrs v && v ? description;
  defaultsOf = opts: b.listToAttrs (b.concatMap (n:
    let v = opts.${n}; in
    if isOption v then (if v ? default then [ { name = n; value = v.default; } ] else [ ])
    else if b.isAttrs v then [ { name = n; value = defaultsOf v; } ]
    else [ ]) (b.attrNames opts));
  merge = l: r: l // b.mapAttrs (n: v:
    if b.isAttrs v && l ? ${n} && b.isAttrs l.${n} then merge l.${n} v else v) r;
  modulesOf = r: [ r ] ++ b.concatMap (p: modulesOf (load p args)) (b.filter inRender (r.imports or [ ]));
  defaults = b.foldl' merge { }
    (map (r: defaultsOf ((r.options or { }).k3scluster or { })) (modulesOf (load top args)));
  config = {
    k3scluster = merge defaults (hostDefs.k3scluster or { });
    system.build = { nixos-generate-config = stubPkg "nixos-generate-config"; };
    virtualisation.podman.package = stubPkg "podman";
    systemd.package = stubPkg "systemd";
    nix.package = stubPkg "nix";
  };
  # Leaves are evaluated (a string is forced whole), so every package and config value
  # a template interpolates needs a stand-in here.
  stubPkg = name: { outPath = "/nix/store/stub-${name}"; inherit name; };
  pkgs = b.listToAttrs (map (n: { name = n; value = stubPkg n; }) [
    "bash" "coreutils" "util-linux" "parted" "dosfstools" "e2fsprogs" "gnugrep" "gnused"
    "gawk" "findutils" "nixos-install-tools" "podman" "iproute2" "systemd" "k3s" "etcd"
  ]) // b.listToAttrs (b.genList (i: {
    name = "k3s_1_${toString (i + 20)}";
    value = stubPkg "k3s" // { version = "1.${toString (i + 20)}.1+k3s1"; };
  }) 20);
  args = { inherit config lib pkgs; name = "node"; modulesPath = "/modules"; k3sclusterTarget = "target"; k3sclusterGrubDevices = [ "/dev/disk/by-id/stand-in" ]; };

  # A container's config function gets the container's own config: a stand-in made of what
  # the function itself defines (a fixed point; the module system would merge in more).
  containerArgs = f:
    let own = removeAttrs (f (args // { config = own; })) [ "imports" ];
    in args // { config = own; };

  # the definitions of one module value, and the render-dir files it imports
  defsOf = r: if r ? config || r ? options then r.config or { } else removeAttrs r [ "imports" "options" "_file" ];
  walk = path: v:
    if b.isAttrs v && v ? _type then
      (if v._type == "merge" then b.concatMap (walk path) v.contents else walk path v.content)
    else if b.isFunction v && b.length path == 3 && b.head path == "containers" && b.elemAt path 2 == "config" then
      walkModule path (v (containerArgs v))
    else if b.isAttrs v && !(v ? outPath) && v != { } then
      b.concatMap (n: walk (path ++ [ n ]) v.${n}) (b.attrNames v)
    else [ path ];
  walkModule = prefix: r:
    (let d = defsOf r; in if d == { } then [ ] else walk prefix d)
    ++ b.concatMap (p: walkModule prefix (load p args)) (b.filter inRender (r.imports or [ ]));
in
walkModule [ ] (load top args)
