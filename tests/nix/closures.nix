# Two tiny "systems" for tests/test_build.py, built by the real Nix in a store of the test's own
# (NIX_STORE_DIR under tmp): their closures differ the way a NixOS upgrade does (a new kernel and
# K3s, nano removed, hello added), so `nix store diff-closures` prints its real output for them.
# The builder is /bin/sh with absolute paths: no nixpkgs, no network, no sandbox.
let
  mk = name: deps: size: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "/bin/mkdir $out; /usr/bin/head -c ${toString size} /dev/zero > $out/blob; echo ${toString deps} > $out/deps" ];
  };
  system = v:
    let
      linux = mk "linux-${if v == 1 then "6.12.30" else "6.12.31"}" [ ] (if v == 1 then 100000 else 120000);
      k3s = mk "k3s-${if v == 1 then "1.32.4+k3s1" else "1.32.5+k3s1"}" [ ] 50000;
      nano = mk "nano-8.4" [ ] 30000;
      hello = mk "hello-2.12.1" [ ] 20000;
    in
    mk "nixos-system-olaf-26.05" ([ linux k3s ] ++ (if v == 1 then [ nano ] else [ hello ])) 10;
in
{ before = system 1; after = system 2; }
