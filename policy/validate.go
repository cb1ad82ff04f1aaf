package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
)

// validate checks an ALLOW or DENY policy the way Istio's admission webhook
// does (pkg/config/validation ValidateAuthorizationPolicy), as far as the
// checks can change what the policy means. A policy Istio rejects never
// reaches a sidecar, so the kernel must not enforce it; where this check is
// stricter than Istio's, the kernel only enforces less.
func validate(spec *securityv1beta1.AuthorizationPolicy) error {
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	set := 0
	if spec.GetSelector() != nil {
		set++
	}
	if spec.GetTargetRef() != nil {
		set++
	}
	if len(spec.GetTargetRefs()) > 0 {
		set++
	}
	if set > 1 {
		add(errors.New("only one of selector, targetRef and targetRefs may be set"))
	}
	if sel := spec.GetSelector(); sel != nil {
		for k, v := range sel.GetMatchLabels() {
			if k == "" || strings.Contains(k, "*") || strings.Contains(v, "*") {
				add(fmt.Errorf("selector label %q=%q: empty keys and wildcards are not supported", k, v))
			}
		}
	}
	for _, ref := range append([]*typev1beta1.PolicyTargetReference{spec.GetTargetRef()}, spec.GetTargetRefs()...) {
		add(validateTargetRef(ref))
	}
	if spec.GetProvider() != nil {
		add(fmt.Errorf("provider is only for the CUSTOM action, found %s", spec.GetAction()))
	}
	if spec.GetAction() == securityv1beta1.AuthorizationPolicy_DENY && spec.Rules == nil {
		add(errors.New("DENY action without rules is never triggered"))
	}
	for i, rule := range spec.GetRules() {
		if err := validateRule(rule); err != nil {
			add(fmt.Errorf("rule %d: %w", i, err))
		}
	}
	return errors.Join(errs...)
}

func validateTargetRef(ref *typev1beta1.PolicyTargetReference) error {
	if ref == nil {
		return nil
	}
	if ref.GetName() == "" {
		return errors.New("targetRef without name")
	}
	if ref.GetNamespace() != "" {
		return fmt.Errorf("targetRef %s: cross namespace references are not supported", ref.GetName())
	}
	group := ref.GetGroup()
	if group == "" {
		group = "core"
	}
	switch group + "/" + ref.GetKind() {
	case "core/Service", "networking.istio.io/ServiceEntry", "gateway.networking.k8s.io/Gateway", "gateway.networking.k8s.io/GatewayClass":
		return nil
	}
	return fmt.Errorf("targetRef %s: kind %s/%s is not supported", ref.GetName(), ref.GetGroup(), ref.GetKind())
}

func validateRule(rule *securityv1beta1.Rule) error {
	if rule == nil {
		return errors.New("rule is null")
	}
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if rule.From != nil && len(rule.From) == 0 {
		add(errors.New("from is empty"))
	}
	for _, from := range rule.From {
		if from.GetSource() == nil {
			add(errors.New("from.source is null"))
			continue
		}
		add(validateSource(from.GetSource()))
	}
	if rule.To != nil && len(rule.To) == 0 {
		add(errors.New("to is empty"))
	}
	for _, to := range rule.To {
		if to.GetOperation() == nil {
			add(errors.New("to.operation is null"))
			continue
		}
		add(validateOperation(to.GetOperation()))
	}
	for _, c := range rule.When {
		if c == nil {
			add(errors.New("when condition is null"))
			continue
		}
		if c.GetKey() == "" {
			add(errors.New("when condition without key"))
			continue
		}
		if len(c.GetValues()) == 0 && len(c.GetNotValues()) == 0 {
			add(fmt.Errorf("when %s: neither values nor notValues", c.GetKey()))
			continue
		}
		add(validateAttribute(c.GetKey(), c.GetValues()))
		add(validateAttribute(c.GetKey(), c.GetNotValues()))
	}
	return errors.Join(errs...)
}

func validateSource(s *securityv1beta1.Source) error {
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces) > 0 &&
		len(s.ServiceAccounts)+len(s.NotServiceAccounts) > 0 {
		add(errors.New("serviceAccounts cannot be set with namespaces or principals"))
	}
	if len(s.Principals)+len(s.RequestPrincipals)+len(s.Namespaces)+len(s.IpBlocks)+len(s.RemoteIpBlocks)+
		len(s.NotPrincipals)+len(s.NotRequestPrincipals)+len(s.NotNamespaces)+len(s.NotIpBlocks)+len(s.NotRemoteIpBlocks)+
		len(s.ServiceAccounts)+len(s.NotServiceAccounts)+len(s.TrustDomains)+len(s.NotTrustDomains) == 0 {
		add(errors.New("from.source is empty"))
	}
	for _, l := range []struct {
		name   string
		values []string
	}{
		{"ipBlocks", s.IpBlocks}, {"notIpBlocks", s.NotIpBlocks},
		{"remoteIpBlocks", s.RemoteIpBlocks}, {"notRemoteIpBlocks", s.NotRemoteIpBlocks},
	} {
		add(validateIPs(l.name, l.values))
	}
	for _, l := range []struct {
		name   string
		values []string
	}{
		{"principals", s.Principals}, {"notPrincipals", s.NotPrincipals},
		{"requestPrincipals", s.RequestPrincipals}, {"notRequestPrincipals", s.NotRequestPrincipals},
		{"namespaces", s.Namespaces}, {"notNamespaces", s.NotNamespaces},
	} {
		add(checkEmpty(l.name, l.values))
	}
	add(validateServiceAccounts("serviceAccounts", s.ServiceAccounts))
	add(validateServiceAccounts("notServiceAccounts", s.NotServiceAccounts))
	add(validateTrustDomains("trustDomains", s.TrustDomains))
	add(validateTrustDomains("notTrustDomains", s.NotTrustDomains))
	return errors.Join(errs...)
}

func validateOperation(o *securityv1beta1.Operation) error {
	var errs []error
	add := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(o.Ports)+len(o.Methods)+len(o.Paths)+len(o.Hosts)+len(o.NotPorts)+len(o.NotMethods)+len(o.NotPaths)+len(o.NotHosts) == 0 {
		add(errors.New("to.operation is empty"))
	}
	add(validatePorts("ports", o.Ports))
	add(validatePorts("notPorts", o.NotPorts))
	for _, l := range []struct {
		name   string
		values []string
	}{
		{"methods", o.Methods}, {"notMethods", o.NotMethods},
		{"paths", o.Paths}, {"notPaths", o.NotPaths},
		{"hosts", o.Hosts}, {"notHosts", o.NotHosts},
	} {
		add(checkEmpty(l.name, l.values))
	}
	add(validatePathTemplates("paths", o.Paths))
	add(validatePathTemplates("notPaths", o.NotPaths))
	return errors.Join(errs...)
}

// validateAttribute is Istio's security.ValidateAttribute: the when keys
// Istio knows, with their value formats.
func validateAttribute(key string, values []string) error {
	if err := checkEmpty(key, values); err != nil {
		return err
	}
	switch {
	case strings.HasPrefix(key, "request.headers"), strings.HasPrefix(key, "request.auth.claims"),
		strings.HasPrefix(key, "experimental.envoy.filters."):
		return validateMapKey(key)
	case key == "source.ip", key == "remote.ip", key == "destination.ip":
		return validateIPs(key, values)
	case key == "destination.port":
		return validatePorts(key, values)
	case key == "source.serviceAccount":
		return validateServiceAccounts(key, values)
	case key == "source.trustDomain":
		return validateWildcards(key, values)
	case key == "source.namespace", key == "source.principal", key == "request.auth.principal",
		key == "request.auth.audiences", key == "request.auth.presenter", key == "connection.sni":
		return nil
	}
	return fmt.Errorf("unknown attribute %s", key)
}

func checkEmpty(name string, values []string) error {
	for _, v := range values {
		if v == "" {
			return fmt.Errorf("%s: empty value", name)
		}
	}
	return nil
}

// parseIPBlock reads an address or CIDR the way istiod does
// (util.AddrStrToPrefix); host bits are masked, as Envoy's CidrRange does.
// Zoned addresses are refused: an Envoy CIDR has no zone.
func parseIPBlock(v string) (netip.Prefix, error) {
	if strings.Contains(v, "/") {
		p, err := netip.ParsePrefix(v)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("bad CIDR %q: %w", v, err)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(v)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("bad IP address %q: %w", v, err)
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("bad IP address %q: zones are not supported", v)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func validateIPs(name string, values []string) error {
	if err := checkEmpty(name, values); err != nil {
		return err
	}
	for _, v := range values {
		if _, err := parseIPBlock(v); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

// parsePort reads a port the way istiod does (strconv.ParseUint, 0-65535).
func parsePort(v string) (uint16, error) {
	p, err := strconv.ParseUint(v, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("bad port %q: %w", v, err)
	}
	return uint16(p), nil
}

func validatePorts(name string, values []string) error {
	if err := checkEmpty(name, values); err != nil {
		return err
	}
	for _, v := range values {
		if _, err := parsePort(v); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	return nil
}

func validateServiceAccounts(name string, values []string) error {
	if len(values) > 16 {
		return fmt.Errorf("%s: more than 16 values", name)
	}
	for _, v := range values {
		ns, sa, cut := strings.Cut(v, "/")
		switch {
		case v == "":
			return fmt.Errorf("%s: empty value", name)
		case strings.Contains(v, "*"):
			return fmt.Errorf("%s: wildcard in %q", name, v)
		case strings.Count(v, "/") > 1, cut && (ns == "" || sa == ""):
			return fmt.Errorf("%s: %q is not serviceAccount or namespace/serviceAccount", name, v)
		case len(v) > 320:
			return fmt.Errorf("%s: %q is longer than 320 characters", name, v)
		}
	}
	return nil
}

// validateWildcards is Istio's CheckWildcardValues: at most one '*', at the
// start or the end.
func validateWildcards(name string, values []string) error {
	if err := checkEmpty(name, values); err != nil {
		return err
	}
	for _, v := range values {
		n := strings.Count(v, "*")
		if n > 1 || n == 1 && v != "*" && !strings.HasPrefix(v, "*") && !strings.HasSuffix(v, "*") {
			return fmt.Errorf("%s: bad wildcard in %q", name, v)
		}
	}
	return nil
}

func validateTrustDomains(name string, values []string) error {
	if err := validateWildcards(name, values); err != nil {
		return err
	}
	for _, v := range values {
		if strings.Contains(v, "/") {
			return fmt.Errorf("%s: %q contains '/'", name, v)
		}
	}
	return nil
}

func validateMapKey(key string) error {
	open := strings.Index(key, "[")
	if strings.HasSuffix(key, "]") && open > 0 && open < len(key)-2 {
		return nil
	}
	return fmt.Errorf("bad key %s: want a[b]", key)
}

var validPathLiteral = regexp.MustCompile("^[a-zA-Z0-9-._~%!$&'()+,;:@=]+$")

// validatePathTemplates is Istio's CheckValidPathTemplate ({*} and {**}
// path templates).
func validatePathTemplates(name string, paths []string) error {
	for _, path := range paths {
		template := strings.Contains(path, "{*}") || strings.Contains(path, "{**}")
		matchAnySeen := false
		for _, glob := range strings.Split(strings.Trim(path, "/"), "/") {
			switch {
			case (glob == "{*}" || glob == "{**}") && matchAnySeen:
				return fmt.Errorf("%s: %q: {**} is not the last operator", name, path)
			case glob == "{*}":
				continue
			case glob == "{**}":
				matchAnySeen = true
				continue
			case strings.ContainsAny(glob, "{}"):
				return fmt.Errorf("%s: %q: '{' or '}' outside a path template", name, path)
			case template && !validPathLiteral.MatchString(glob):
				return fmt.Errorf("%s: %q: invalid segment %q", name, path, glob)
			}
		}
	}
	return nil
}
