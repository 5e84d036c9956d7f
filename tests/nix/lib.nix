# A small stand-in for the parts of nixpkgs' lib (and lib.evalModules) that nix/module.nix uses,
# written for the tests: nixpkgs itself is not available in CI. It keeps the semantics that matter
# for the module: option declarations with types and defaults, definitions merged by type,
# mkIf/mkMerge/mkDefault/mkForce pushed down lazily (a condition may depend on config), freeform
# submodules, and undeclared paths (systemd.*, networking.*) merged like NixOS does.
let
  inherit (builtins)
    attrNames
    all
    any
    concatLists
    concatStringsSep
    elemAt
    filter
    foldl'
    genList
    head
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isPath
    isString
    length
    listToAttrs
    mapAttrs
    match
    substring
    stringLength
    toJSON
    ;

  # --- attrsets, lists, strings -------------------------------------------------------------
  unique = list: foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ] list;
  concatMap = f: list: concatLists (map f list);
  last = list: elemAt list (length list - 1);
  init = list: genList (i: elemAt list i) (length list - 1);
  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: set: if cond then set else { };
  optionalString = cond: s: if cond then s else "";
  hasPrefix = prefix: s: substring 0 (stringLength prefix) s == prefix;
  hasSuffix =
    suffix: s:
    let
      ls = stringLength s;
      lx = stringLength suffix;
    in
    ls >= lx && substring (ls - lx) lx s == suffix;
  removePrefix =
    prefix: s:
    if hasPrefix prefix s then substring (stringLength prefix) (stringLength s) s else s;
  removeSuffix =
    suffix: s:
    if hasSuffix suffix s then substring 0 (stringLength s - stringLength suffix) s else s;
  splitString =
    sep: s: filter isString (builtins.split (builtins.replaceStrings [ "." "[" "]" ] [ "\\." "\\[" "\\]" ] sep) s);
  toInt =
    s:
    let
      m = match "[[:space:]]*(-?[0-9]+)[[:space:]]*" s;
    in
    if m == null then throw "toInt: '${s}' is not an integer" else builtins.fromJSON (head m);
  isDerivation = v: isAttrs v && (v.type or null) == "derivation";
  attrByPath =
    path: fallback: set:
    if path == [ ] then
      set
    else if isAttrs set && set ? ${head path} then
      attrByPath (builtins.tail path) fallback set.${head path}
    else
      fallback;
  genAttrs =
    names: f:
    listToAttrs (
      map (name: {
        inherit name;
        value = f name;
      }) names
    );
  getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram}";
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  # --- properties -----------------------------------------------------------------------------
  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkOptionDefault = mkOverride 1500;
  mkDefault = mkOverride 1000;
  mkForce = mkOverride 50;
  defaultPriority = 100;

  # A definition as a list of { value, priority }, conditions evaluated.
  discharge =
    priority: def:
    let
      t = if isAttrs def then def._type or null else null;
    in
    if t == "merge" then
      concatMap (discharge priority) def.contents
    else if t == "if" then
      (if def.condition then discharge priority def.content else [ ])
    else if t == "override" then
      discharge def.priority def.content
    else
      [
        {
          value = def;
          inherit priority;
        }
      ];

  # Whether a definition is an attrset of further definitions, judged without evaluating any
  # condition (the content decides), so config can depend on config.
  isNested =
    def:
    let
      t = if isAttrs def then def._type or null else null;
    in
    if t == "merge" then
      def.contents != [ ] && all isNested def.contents
    else if t == "if" || t == "override" then
      isNested def.content
    else
      isAttrs def && t == null && !isDerivation def && !(def ? outPath);

  # { name = [ defs ]; } from one definition, properties pushed into the attributes.
  pushDown =
    def:
    let
      t = def._type or null;
    in
    if t == "merge" then
      foldl' (acc: sub: zipDefs acc (pushDown sub)) { } def.contents
    else if t == "if" then
      mapAttrs (_: defs: map (mkIf def.condition) defs) (pushDown def.content)
    else if t == "override" then
      mapAttrs (_: defs: map (mkOverride def.priority) defs) (pushDown def.content)
    else
      mapAttrs (_: v: [ v ]) def;
  zipDefs =
    a: b:
    a
    // mapAttrs (name: defs: (a.${name} or [ ]) ++ defs) b;

  # The winning values: those of the highest priority (the lowest number).
  winners =
    valued:
    let
      best = foldl' (m: v: if v.priority < m then v.priority else m) 9999 valued;
    in
    map (v: v.value) (filter (v: v.priority == best) valued);

  # --- types ----------------------------------------------------------------------------------
  showLoc = loc: concatStringsSep "." loc;
  mkOptionType =
    {
      name,
      check,
      merge ? mergeEqual,
      getSubOptions ? (_: { }),
    }:
    {
      _type = "option-type";
      inherit
        name
        check
        merge
        getSubOptions
        ;
    };
  checked =
    type: loc: v:
    if type.check v then v else throw "The option `${showLoc loc}' is not of type ${type.name}: ${toJSON v}";
  mergeEqual =
    loc: values:
    if all (v: v == head values) values then
      head values
    else
      throw "The option `${showLoc loc}' has conflicting definitions: ${toJSON values}";

  # Recursive merge for undeclared paths and freeform values: attrsets per key, lists appended,
  # anything else must agree.
  mergeAny =
    loc: defs:
    if defs != [ ] && all isNested defs then
      let
        pushed = foldl' (acc: d: zipDefs acc (pushDown d)) { } defs;
        # An attribute whose every definition sits under a false mkIf is absent, as in NixOS.
        defined = builtins.removeAttrs pushed (
          filter (name: concatMap (discharge defaultPriority) pushed.${name} == [ ]) (attrNames pushed)
        );
      in
      mapAttrs (name: sub: mergeAny (loc ++ [ name ]) sub) defined
    else
      let
        values = winners (concatMap (discharge defaultPriority) defs);
      in
      if values == [ ] then
        throw "The option `${showLoc loc}' is used but not defined."
      else if all isList values then
        concatLists values
      else
        mergeEqual loc values;

  types = rec {
    bool = mkOptionType {
      name = "boolean";
      check = isBool;
    };
    str = mkOptionType {
      name = "string";
      check = isString;
    };
    int = mkOptionType {
      name = "signed integer";
      check = isInt;
    };
    port = mkOptionType {
      name = "16 bit unsigned integer";
      check = v: isInt v && v >= 0 && v <= 65535;
    };
    path = mkOptionType {
      name = "path";
      check = v: isPath v || (isString v && hasPrefix "/" v) || (isAttrs v && v ? outPath);
    };
    package = mkOptionType {
      name = "package";
      check = v: isDerivation v || (isAttrs v && v ? outPath) || isString v;
    };
    anything = mkOptionType {
      name = "anything";
      check = _: true;
      merge = mergeAny;
    };
    # One definition only (nixpkgs' read-only nixpkgs.overlays under runNixOSTest is one).
    unique =
      { message }:
      elem:
      mkOptionType {
        name = elem.name;
        check = elem.check;
        merge =
          loc: values:
          if length values == 1 then
            head values
          else
            throw "The option `${showLoc loc}' is defined multiple times: ${message}";
      };
    nullOr =
      elem:
      mkOptionType {
        name = "null or ${elem.name}";
        check = v: v == null || elem.check v;
        merge =
          loc: values:
          let
            set = filter (v: v != null) values;
          in
          if set == [ ] then null else elem.merge loc (map (checked elem loc) set);
        getSubOptions = elem.getSubOptions;
      };
    listOf =
      elem:
      mkOptionType {
        name = "list of ${elem.name}";
        check = isList;
        merge = loc: values: concatLists (map (map (checked elem loc)) values);
      };
    attrsOf =
      elem:
      mkOptionType {
        name = "attribute set of ${elem.name}";
        check = isAttrs;
        merge =
          loc: values:
          let
            pushed = foldl' (acc: d: zipDefs acc (pushDown d)) { } values;
          in
          mapAttrs (
            name: defs:
            elem.merge (loc ++ [ name ]) (map (checked elem (loc ++ [ name ])) (winners (concatMap (discharge defaultPriority) defs)))
          ) pushed;
      };
    submodule =
      module:
      let
        m = if builtins.isFunction module then module { } else module;
        decls = m.options or { };
      in
      mkOptionType {
        name = "submodule";
        check = isAttrs;
        merge =
          loc: values:
          evalTree {
            inherit loc decls;
            defs = values;
            freeformType = m.freeformType or null;
          };
        getSubOptions = _: decls;
      };
  };

  mkOption =
    attrs:
    {
      _type = "option";
      type = types.anything;
    }
    // attrs;
  mkEnableOption =
    name:
    mkOption {
      type = types.bool;
      default = false;
      description = "Whether to enable ${name}.";
    };
  isOption = v: isAttrs v && (v._type or null) == "option";
  # nixpkgs' mkPackageOption, for the arguments the module uses.
  mkPackageOption =
    pkgs: name:
    {
      default ? name,
      extraDescription ? "",
      pkgsText ? "pkgs",
    }:
    let
      path = if isList default then default else [ default ];
      shown = concatStringsSep "." path;
    in
    mkOption {
      type = types.package;
      default = attrByPath path (throw "${pkgsText}.${shown} cannot be found") pkgs;
      defaultText = literalExpression "${pkgsText}.${shown}";
      description = "The ${name} package to use." + optionalString (extraDescription != "") " ${extraDescription}";
    };

  # --- evaluation -----------------------------------------------------------------------------
  # One option: its definitions (wrapped in properties) against its declaration.
  evalOption =
    loc: decl: defs:
    let
      valued = concatMap (discharge defaultPriority) defs;
      withDefault =
        valued
        ++ optional (decl ? default) {
          value = decl.default;
          priority = 1500;
        };
      values = winners withDefault;
    in
    if values == [ ] then
      throw "The option `${showLoc loc}' is used but not defined."
    else
      decl.type.merge loc (map (checked decl.type loc) values);

  # A tree of declarations (nested attrsets with options as leaves) against definitions; keys
  # nobody declared go to freeformType (inside a submodule) or are merged like NixOS merges
  # undeclared unit attributes (at the top).
  evalTree =
    {
      loc,
      decls,
      defs,
      freeformType,
    }:
    let
      pushed = foldl' (acc: d: zipDefs acc (pushDown d)) { } (filter isNested defs);
      names = unique (attrNames decls ++ attrNames pushed);
      one =
        name:
        let
          l = loc ++ [ name ];
          sub = pushed.${name} or [ ];
        in
        if decls ? ${name} then
          (
            if isOption decls.${name} then
              evalOption l decls.${name} sub
            else
              evalTree {
                loc = l;
                decls = decls.${name};
                defs = sub;
                inherit freeformType;
              }
          )
        else if freeformType != null then
          freeformType.merge l (winners (concatMap (discharge defaultPriority) sub))
        else
          mergeAny l sub;
    in
    listToAttrs (
      map (name: {
        inherit name;
        value = one name;
      }) names
    );

  # lib.evalModules, reduced: modules are functions of { config, lib, pkgs, options } or attrsets,
  # returning { imports?, options?, config? } (or config shorthand).
  evalModules =
    {
      modules,
      specialArgs ? { },
    }:
    let
      collect =
        m:
        let
          loaded = if isPath m || isString m then import m else m;
          value =
            if builtins.isFunction loaded then
              loaded (specialArgs // { inherit config options lib; })
            else
              loaded;
          # { options, config, imports } or the shorthand: everything but imports is config.
          structured = value ? options || value ? config;
          self = {
            options = value.options or { };
            config =
              if structured then
                value.config or { }
              else
                builtins.removeAttrs value [
                  "imports"
                  "_file"
                  "key"
                ];
          };
        in
        [ self ] ++ concatMap collect (value.imports or [ ]);
      all' = concatMap collect modules;
      options = foldl' mergeDecls { } (map (m: m.options) all');
      config = evalTree {
        loc = [ ];
        decls = options;
        defs = map (m: m.config) all';
        freeformType = null;
      };
    in
    {
      inherit config options;
    };
  mergeDecls =
    a: b:
    a
    // mapAttrs (
      name: v:
      if a ? ${name} && !isOption v && !isOption a.${name} then mergeDecls a.${name} v else v
    ) b;

  # lib.fileset, for the one use nix/package.nix makes of it: a source of a few files and folders
  # under a root (copied into the store when instantiated, as nixpkgs does).
  fileset = {
    unions = paths: paths;
    toSource =
      { root, fileset }:
      let
        wanted = map toString fileset;
        keep =
          path: _type:
          any (w: path == w || hasPrefix "${w}/" path || hasPrefix "${path}/" w) wanted;
      in
      builtins.path {
        path = root;
        name = "source";
        filter = keep;
      };
  };

  lib = {
    inherit fileset;
    licenses.mit = {
      spdxId = "MIT";
      shortName = "mit";
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];
    inherit
      unique
      concatMap
      last
      init
      optional
      optionals
      optionalAttrs
      optionalString
      hasPrefix
      hasSuffix
      removePrefix
      removeSuffix
      splitString
      attrByPath
      genAttrs
      toInt
      getExe
      literalExpression
      mkIf
      mkMerge
      mkOverride
      mkDefault
      mkForce
      mkOptionDefault
      mkOption
      mkEnableOption
      mkPackageOption
      types
      evalModules
      ;
    concatStringsSep = concatStringsSep;
  };
in
lib
